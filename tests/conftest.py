import os
import sys
import tempfile

# tests/oracle.py is imported by name from every test module.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# torch.compile's on-disk cache keys a compiled graph on the graph, not on the fake kernels of the custom ops
# in it: a cache written by an older build of auxfuse can replay that build's output shapes. Each test run
# compiles into a cache of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="auxfuse-inductor-"))

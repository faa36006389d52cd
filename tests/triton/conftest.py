import os
import sys

# tests/oracle.py is imported by name (tests/ may not be on sys.path when only tests/triton is collected).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

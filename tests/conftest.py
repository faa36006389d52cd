import os
import sys

# tests/oracle.py is imported by name from every test module.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

"""A model module that fails to import (tests of train.py's --net errors)."""

raise ImportError("this module is broken on purpose")

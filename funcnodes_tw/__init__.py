"""
funcnodes_tw: the FuncNodes worker as a Twisted/Autobahn daemon.
"""

__version__ = "0.1.0"

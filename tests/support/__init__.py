"""Helpers shared by several test modules (imported as `support.<module>`: pytest puts tests/ on
sys.path). Test modules import from here and from conftest's fixtures, never from each other."""

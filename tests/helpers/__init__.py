"""Helpers shared by test modules (imported as ``helpers.<module>``), so no test module imports another."""

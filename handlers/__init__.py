"""Example services shipped with aserver."""

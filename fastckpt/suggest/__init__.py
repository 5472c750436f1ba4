"""Rules suggested when names or layouts differ, made only where they can be proved."""

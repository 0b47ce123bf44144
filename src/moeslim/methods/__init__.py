"""Methods: pure searches from observations to a Plan; they never mutate a model."""

"""An example Django app whose feeds dim spreads over the serving processes."""

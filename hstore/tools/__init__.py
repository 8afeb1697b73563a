"""Harnesses and inspection helpers behind the `hstore` CLI, outside the library's data path."""

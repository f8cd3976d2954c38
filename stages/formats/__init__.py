"""Log readers: one module per source format, each ``read(unit, *, mapping, fetch) -> list[Streams]``."""

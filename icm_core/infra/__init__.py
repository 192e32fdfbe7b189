"""Infrastructure every stage shares: atomic artifact I/O, the artifact layout, resumable state, faults."""

"""Categories the generator has never seen: the leave-out protocol, adapters from text alone, analysis."""

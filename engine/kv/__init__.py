"""The LM's KV memory: a page allocator (alloc), per-slot page tables and their policies (pages),
the pool the transformer reads and writes through (pool), and how many sessions a device holds (sizing)."""

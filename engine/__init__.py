"""lockstep engine: slot-batched Moshi + Mimi."""

"""Delivery agents: what the queue runner hands queued recipients to."""

"""The router: groups emails by routing key and hands each batch to a node's pipeline."""

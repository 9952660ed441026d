"""pi-client: classify images with a pi-server's model without revealing them (see client.app)."""

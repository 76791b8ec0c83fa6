"""Simulated IoT devices: CoAP clients that roam between gateways and measure what they see."""

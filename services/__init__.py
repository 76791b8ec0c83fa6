"""The containerised CoAP services that fogmig runs and migrates, and their image builder."""

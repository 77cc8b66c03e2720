"""Images from token grids: iterative decoding (`sampling`) and editing (`editing`)."""

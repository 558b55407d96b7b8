"""Model code: checkpoint specs, strict loading, the decoder as layer pieces, the vision encoder,
prompt building, and the tiny random checkpoint factory."""

"""The relay protocol both ends speak: framing, frames, the frame-order states,
records, the login signature, the wire error codes and every limit (spec/07)."""

"""Packed ternary layouts. Each module draws its bit layout and has a numpy reference pack/unpack."""

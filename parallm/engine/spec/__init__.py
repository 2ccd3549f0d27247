"""Speculative decoding: drafters that propose tokens and the math that verifies them."""

"""Channel adapters (SPEC section 7); see base.py for the interface."""

"""Reads what sabiscale runs leave behind; never imported by the sabiscale library."""

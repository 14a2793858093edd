"""Interoperation with other libraries' formats (diffusers)."""

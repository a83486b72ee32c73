"""The model families (``family.Family``), one module each."""

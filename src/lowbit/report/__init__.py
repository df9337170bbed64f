"""Reports: terminal summaries (rich); HTML / JSON reports arrive with validate and profile."""

"""Which checkpoint bytes feed which model bytes: rules, name mapping, conversion views,
DTensor geometry, transformers' conversions and the planning engine (``LoadPlan``)."""

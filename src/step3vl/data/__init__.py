"""Training data for step3vl: synthetic, program-checkable task families (``step3vl.data.families``)
with their drawing helpers (``step3vl.data.render``) and the dataset writer (``step3vl.data.io``)."""

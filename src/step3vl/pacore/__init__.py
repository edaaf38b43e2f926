"""PaCoRe: parallel coordinated reasoning (inference rounds, and the training stage's message sets)."""

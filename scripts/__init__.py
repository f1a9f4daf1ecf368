"""The top floor: what drives the three commands (the demo and the benchmark). Nothing below
imports it."""

"""Storyboards: many keyframes, one film (schema, rendering, shot cache, colour, report)."""

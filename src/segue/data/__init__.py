"""Training data: procedurally generated keyframe videos with captions."""

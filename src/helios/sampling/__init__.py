"""The sampling layer: sigma schedules and solver steps, options and variants, prompt schedules, the plan of a video,
the multi-term memory and one chunk's denoising loop. Pure math on tensors; it imports nothing else from helios."""

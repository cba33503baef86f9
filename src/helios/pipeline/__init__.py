"""The pipeline layer: a whole video from a model folder (HeliosPipeline.stream), its text encoder, VAE, inputs,
outputs, steering and resumable state. It imports from model/, sampling/ and scale/."""

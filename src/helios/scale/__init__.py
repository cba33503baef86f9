"""The scale layer: capabilities applied to a loaded model from outside (offload and block streaming, quantization,
LoRA, compile, several processes). It imports from model/ only."""

"""Speed measurements against peers: `cpu` (TensorFlow on CPU, `keras-vit benchmark`) and
`accelerator` (training MFU on any Keras backend, `keras-vit benchmark-accelerator`)."""

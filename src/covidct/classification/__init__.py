"""COVID / non-COVID classification: EfficientNet from timm, cached inputs, training and scoring."""

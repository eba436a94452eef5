"""Models: one architecture adapter per model family (vit, resnet), and the digits models
registered with timm (zoo)."""

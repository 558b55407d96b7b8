"""Small models trained here, and what they measure: a visual-QA checkpoint trained on generated
pictures (the demo's default model and the accuracy anchor for lossy image techniques)."""

"""What the bundle configs call: training helpers, the demo."""

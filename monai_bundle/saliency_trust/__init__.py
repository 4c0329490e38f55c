"""SaliencyTrust engine: can this saliency map be trusted?"""
__version__ = "0.1.0"

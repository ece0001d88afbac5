"""unsupft.models"""

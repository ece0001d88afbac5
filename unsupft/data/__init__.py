"""unsupft.data"""

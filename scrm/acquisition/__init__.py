"""Acquisition (获客): channel codes and what they bring, tracked links, Official Account menus.

One concern per module: ``codes`` (create, list, disable codes through the channel's platform),
``arrivals`` (what a code does when someone comes through it), ``figures`` (scans, new customers,
conversions and cost per code and day), ``render`` (PNG/SVG with segno), ``links`` (tracked redirects), ``menus`` (what a chat menu's button does).
"""

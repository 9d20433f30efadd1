"""Image ciphers behind one interface, and the statistics that judge them (entropy, NPCR/UACI, NIST)."""

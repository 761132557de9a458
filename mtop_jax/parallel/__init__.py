"""Devices: the mesh and logical-axis rules (``sharding``), several processes
(``distributed``). DESIGN.md section 8."""

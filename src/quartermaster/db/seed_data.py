"""Static inputs of the seed generator (``quartermaster.db.seed``): word lists, distributions
and the invariant checks.

Plain tuples, so the generated data depends only on the random seed, never on a library version.
"""

from __future__ import annotations

#: (code, city) — warehouse ``WH-<code>`` named "<city> DC".
WAREHOUSE_CITIES: tuple[tuple[str, str], ...] = (
    ("AMS", "Amsterdam"),
    ("BER", "Berlin"),
    ("PAR", "Paris"),
    ("MAD", "Madrid"),
    ("MIL", "Milan"),
    ("WAW", "Warsaw"),
    ("VIE", "Vienna"),
    ("PRG", "Prague"),
    ("CPH", "Copenhagen"),
    ("STO", "Stockholm"),
    ("BRU", "Brussels"),
    ("LYS", "Lyon"),
    ("HAM", "Hamburg"),
    ("MUC", "Munich"),
    ("RTM", "Rotterdam"),
    ("DUB", "Dublin"),
    ("LIS", "Lisbon"),
    ("ZRH", "Zurich"),
    ("HEL", "Helsinki"),
    ("OSL", "Oslo"),
)

COMPANY_ADJECTIVES: tuple[str, ...] = (
    "Northwind", "Blue River", "Summit", "Atlas", "Nordic", "Alpine", "Harbor", "Iron Bridge",
    "Evergreen", "Pioneer", "Red Oak", "Silver Peak", "Granite", "Meridian", "Crescent",
    "Westfield", "Oakridge", "Baltic", "Rhine", "Danube", "Polar", "Coastal", "Highland",
    "Lakeside", "Sterling", "Vanguard", "Keystone", "Horizon", "Falcon", "Cobalt",
)  # fmt: skip

COMPANY_NOUNS: tuple[str, ...] = (
    "Fasteners", "Engineering", "Construction", "Machining", "Logistics", "Industrial Supply",
    "Fabrication", "Maintenance", "Automation", "Building Services", "Plant Hire", "Metalworks",
    "Installations", "Hydraulics", "Electrical", "Joinery", "Facilities", "Manufacturing",
    "Marine", "Robotics",
)  # fmt: skip

COMPANY_SUFFIXES: tuple[str, ...] = (
    "GmbH", "B.V.", "Ltd", "S.A.", "AG", "SRL", "Oy", "AB", "A/S", "Sp. z o.o.", "s.r.o.", "NV",
    "SAS", "Inc.",
)  # fmt: skip

EMAIL_LOCALS: tuple[str, ...] = ("orders", "purchasing", "procurement", "buyer", "accounts")


#: (SKU prefix, category, attributes, items, sizes, (min cents, max cents)).
CATEGORIES: tuple[
    tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[int, int]], ...
] = (
    (
        "FST",
        "Fasteners",
        ("Stainless", "Zinc-Plated", "Galvanized", "Brass", "A4 Stainless", "Black Oxide"),
        ("Hex Bolt", "Socket Cap Screw", "Wood Screw", "Machine Screw", "Hex Nut", "Lock Nut",
         "Flat Washer", "Spring Washer", "Threaded Rod", "Anchor Bolt", "Blind Rivet", "Wing Nut"),
        ("M3", "M4", "M5", "M6", "M8", "M10", "M12", "M16", "M20"),
        (50, 5_000),
    ),
    (
        "TLS",
        "Tools",
        ("Professional", "Compact", "Heavy-Duty", "Ergonomic", "18V", "Insulated"),
        ("Cordless Drill", "Impact Driver", "Angle Grinder", "Torque Wrench", "Socket Set",
         "Combination Wrench", "Screwdriver Set", "Claw Hammer", "Spirit Level", "Hex Key Set"),
        ("6-Piece", "12-Piece", "300 mm", "600 mm", "1/2\"", "3/8\""),
        (500, 250_000),
    ),
    (
        "ELC",
        "Electrical",
        ("IP65", "Flame-Retardant", "Industrial", "DIN Rail", "Outdoor", "Low-Voltage"),
        ("Cable Tie", "Junction Box", "Circuit Breaker", "Wire Connector", "Extension Cord",
         "LED Panel", "Fuse", "Terminal Block", "Cable Gland", "Power Strip"),
        ("10A", "16A", "32A", "3 m", "5 m", "10 m", "2.5 mm²"),
        (50, 50_000),
    ),
    (
        "PLB",
        "Plumbing",
        ("Brass", "Copper", "PVC", "PEX", "Stainless"),
        ("Ball Valve", "Pipe Elbow", "Compression Fitting", "Tee Connector", "Pipe Clamp",
         "Check Valve", "Flexible Hose", "Gate Valve"),
        ("1/2\"", "3/4\"", "1\"", "15 mm", "22 mm", "28 mm"),
        (100, 30_000),
    ),
    (
        "SAF",
        "Safety",
        ("Cut-Resistant", "Anti-Fog", "EN 397", "Reflective", "Nitrile", "Leather"),
        ("Safety Gloves", "Safety Glasses", "Hard Hat", "Ear Defenders", "Hi-Vis Vest",
         "FFP2 Dust Mask", "Safety Boots", "First Aid Kit", "Fall Arrest Harness"),
        ("S", "M", "L", "XL", "Size 42", "Size 44", "Pack of 10"),
        (100, 40_000),
    ),
    (
        "ADH",
        "Adhesives & Sealants",
        ("Clear", "White", "Grey", "High-Strength", "Fast-Cure", "Medium-Strength"),
        ("Epoxy Adhesive", "Silicone Sealant", "Threadlocker", "Construction Adhesive",
         "Duct Tape", "PTFE Tape", "Contact Cement", "Expanding Foam"),
        ("50 ml", "290 ml", "310 ml", "500 ml", "50 m", "25 mm x 50 m"),
        (200, 5_000),
    ),
    (
        "HYD",
        "Hydraulics",
        ("High-Pressure", "2-Wire", "BSP", "JIC", "Double-Acting"),
        ("Hydraulic Hose", "Hose Fitting", "Quick Coupler", "Hydraulic Cylinder", "Gear Pump",
         "Pressure Gauge", "Directional Valve", "Return Filter"),
        ("1/4\"", "3/8\"", "1/2\"", "250 bar", "400 bar", "DN10"),
        (500, 250_000),
    ),
    (
        "PNE",
        "Pneumatics",
        ("Polyurethane", "Nickel-Plated", "Compact", "ISO 15552"),
        ("Air Hose", "Push-In Fitting", "Pneumatic Cylinder", "Solenoid Valve",
         "Filter Regulator", "Blow Gun", "Exhaust Silencer"),
        ("6 mm", "8 mm", "10 mm", "G1/4", "G3/8", "1/4\""),
        (200, 100_000),
    ),
    (
        "BRG",
        "Bearings & Transmission",
        ("Sealed", "Shielded", "Stainless", "Heavy-Duty", "Precision"),
        ("Ball Bearing", "Pillow Block Bearing", "Roller Chain", "V-Belt", "Sprocket",
         "Shaft Collar", "Linear Bearing", "Needle Bearing"),
        ("6201", "6203", "6205", "6305", "08B-1", "SPZ 1000", "20 mm", "25 mm"),
        (200, 50_000),
    ),
    (
        "PKG",
        "Packaging",
        ("Recycled", "Heavy-Duty", "Printed", "Clear", "Brown", "Double-Wall"),
        ("Stretch Film", "Cardboard Box", "Packing Tape", "Bubble Wrap", "Pallet Strap",
         "Void Fill Paper", "Shipping Label", "Mailing Bag"),
        ("300x200x150", "400x300x200", "48 mm x 66 m", "500 mm x 300 m", "Pack of 100"),
        (50, 20_000),
    ),
)  # fmt: skip

#: Shelf prices (cents) many products snap to, so prices tie often.
PRICE_POINTS: tuple[int, ...] = (
    50, 99, 149, 199, 249, 499, 999, 1_499, 1_999, 2_499, 4_999, 9_900, 14_900, 19_900,
    24_900, 49_900, 99_900, 149_900, 249_900,
)  # fmt: skip

#: Band edges (cents) for the other prices: a uniform band, then uniform within it.
PRICE_EDGES: tuple[int, ...] = (
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
)  # fmt: skip

#: Order line quantities, skewed towards small numbers.
QUANTITIES: tuple[int, ...] = (
    1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 8, 10, 10, 12, 15, 20, 24, 25, 30, 40, 50, 100,
)  # fmt: skip

CANCEL_REASONS: tuple[str, ...] = (
    "Customer changed requirements",
    "Duplicate order",
    "Ordered from another supplier",
    "Delivery date too late",
    "Budget not approved",
)

#: Everything above goes into COPY text unescaped (checked before seeding).
WORD_LISTS = (
    WAREHOUSE_CITIES,
    COMPANY_ADJECTIVES,
    COMPANY_NOUNS,
    COMPANY_SUFFIXES,
    EMAIL_LOCALS,
    CATEGORIES,
    CANCEL_REASONS,
)

# Distributions: (cumulative share, value).
TIERS = ((0.60, "STANDARD"), (0.80, "SILVER"), (0.95, "GOLD"), (1.0, "PLATINUM"))
TIER_DISCOUNT_PCT = {"STANDARD": 0, "SILVER": 3, "GOLD": 5, "PLATINUM": 8}
ORDER_STATUSES = ((0.25, "PENDING"), (0.50, "CONFIRMED"), (0.90, "FULFILLED"), (1.0, "CANCELLED"))
QUOTE_STATUSES = (
    (0.30, "DRAFT"),
    (0.60, "SENT"),
    (0.75, "ACCEPTED"),
    (0.90, "REJECTED"),
    (1.0, "EXPIRED"),
)
QUOTE_DISCOUNT_TENTHS = (0, 0, 0, 25, 50, 100)  # percent x 10: 0, 2.5, 5, 10
LOW_STOCK_SHARE = 0.06  # plus the sold-out products' levels: ~8% in all
MAX_WAREHOUSES_PER_PRODUCT = 5


# Consistency checks run by ``check_invariants``: (description, query yielding one text per
# violation).
_OPEN_SQL = "('PENDING', 'CONFIRMED')"
INVARIANT_CHECKS: tuple[tuple[str, str], ...] = (
    (
        "stock levels whose reserved differs from the open orders' allocations",
        f"""
        WITH open_alloc AS (
            SELECT ol.product_id, sa.warehouse_id, sum(sa.quantity) AS qty
            FROM stock_allocations sa
            JOIN order_lines ol ON ol.id = sa.order_line_id
            JOIN orders o ON o.id = ol.order_id
            WHERE o.status IN {_OPEN_SQL}
            GROUP BY 1, 2)
        SELECT coalesce('level ' || sl.id, 'no level for product ' || a.product_id
                        || ' in warehouse ' || a.warehouse_id)
        FROM stock_levels sl
        FULL JOIN open_alloc a
          ON a.product_id = sl.product_id AND a.warehouse_id = sl.warehouse_id
        WHERE sl.id IS NULL OR sl.reserved <> coalesce(a.qty, 0)""",
    ),
    (
        "stock levels whose ledger sums differ from on_hand/reserved",
        """
        SELECT 'level ' || sl.id FROM stock_levels sl
        LEFT JOIN (SELECT stock_level_id, sum(on_hand_delta) AS oh, sum(reserved_delta) AS rd
                   FROM stock_movements GROUP BY 1) m ON m.stock_level_id = sl.id
        WHERE coalesce(m.oh, 0) <> sl.on_hand OR coalesce(m.rd, 0) <> sl.reserved""",
    ),
    (
        "order lines whose line_total is not quantity * unit_price - discount",
        "SELECT 'line ' || id FROM order_lines"
        " WHERE line_total <> quantity * unit_price - discount",
    ),
    (
        "orders whose totals differ from their lines",
        """
        SELECT o.number FROM orders o
        LEFT JOIN (SELECT order_id, sum(quantity * unit_price) AS s, sum(discount) AS d
                   FROM order_lines GROUP BY 1) l ON l.order_id = o.id
        WHERE o.subtotal <> coalesce(l.s, 0) OR o.discount_total <> coalesce(l.d, 0)
           OR o.total <> o.subtotal - o.discount_total""",
    ),
    (
        "order lines of non-cancelled orders whose allocations do not add up to the quantity",
        """
        SELECT 'line ' || ol.id FROM order_lines ol
        JOIN orders o ON o.id = ol.order_id
        LEFT JOIN (SELECT order_line_id, sum(quantity) AS q FROM stock_allocations GROUP BY 1) a
          ON a.order_line_id = ol.id
        WHERE o.status <> 'CANCELLED' AND coalesce(a.q, 0) <> ol.quantity""",
    ),
    (
        "quotations whose totals differ from their lines",
        """
        SELECT q.number FROM quotations q
        LEFT JOIN (SELECT quotation_id, sum(quantity * unit_price) AS s, sum(line_total) AS t,
                          bool_and(line_total = round(quantity * unit_price
                                                      * (1 - discount_percent / 100), 2)) AS ok
                   FROM quotation_lines GROUP BY 1) l ON l.quotation_id = q.id
        WHERE q.subtotal <> coalesce(l.s, 0) OR q.total <> coalesce(l.t, 0)
           OR q.discount_total <> q.subtotal - q.total OR NOT coalesce(l.ok, true)""",
    ),
)

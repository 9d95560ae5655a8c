"""Facts about the paper's datasets that released checkpoints depend on.

Class orders are those of the authors' released checkpoints (their ``cls_names.txt``), which are
not alphabetical; mean/std are their ``meanstd.txt`` values on the 0-255 scale.
"""

DATASETS = {
    'ucm': dict(
        title='UC Merced Land Use',
        mean_255=(123.770241, 125.41281689, 115.35737613),
        std_255=(44.17314347, 41.63589266, 39.5737929),
        label_names=(
            'harbor', 'parkinglot', 'buildings', 'mediumresidential', 'sparseresidential', 'forest',
            'agricultural', 'overpass', 'golfcourse', 'freeway', 'baseballdiamond', 'beach', 'intersection',
            'runway', 'mobilehomepark', 'chaparral', 'airplane', 'river', 'storagetanks', 'tenniscourt',
            'denseresidential',
        ),
    ),
    'aid': dict(
        title='AID (Aerial Image Dataset)',
        mean_255=(101.02608706, 103.9996994, 93.50157708),
        std_255=(40.36728927, 37.11132278, 35.90649976),
        label_names=(
            'Port', 'Square', 'River', 'Pond', 'Playground', 'Mountain', 'Park', 'Airport',
            'SparseResidential', 'Stadium', 'Industrial', 'Church', 'DenseResidential', 'Parking', 'Farmland',
            'Desert', 'Viaduct', 'Forest', 'StorageTanks', 'Center', 'Meadow', 'MediumResidential', 'School',
            'BareLand', 'Commercial', 'BaseballField', 'RailwayStation', 'Resort', 'Bridge', 'Beach',
        ),
    ),
    'nwpu': dict(
        title='NWPU-RESISC45',
        mean_255=(93.847266, 97.20128819, 87.66547902),
        std_255=(37.10216765, 34.61650149, 33.70191772),
        label_names=(
            'river', 'terrace', 'snowberg', 'stadium', 'parking_lot', 'thermal_power_station',
            'rectangular_farmland', 'cloud', 'intersection', 'meadow', 'palace', 'ground_track_field',
            'commercial_area', 'beach', 'church', 'baseball_diamond', 'ship', 'industrial_area', 'bridge',
            'freeway', 'medium_residential', 'circular_farmland', 'mobile_home_park', 'railway', 'forest',
            'sparse_residential', 'harbor', 'wetland', 'mountain', 'airport', 'golf_course', 'overpass',
            'dense_residential', 'chaparral', 'basketball_court', 'airplane', 'tennis_court', 'runway',
            'storage_tank', 'island', 'railway_station', 'lake', 'sea_ice', 'desert', 'roundabout',
        ),
    ),
}


def normalization(tag):
    """(mean, std) on the 0-1 scale that timm's transforms expect."""
    info = DATASETS[tag]
    return tuple(v / 255. for v in info['mean_255']), tuple(v / 255. for v in info['std_255'])

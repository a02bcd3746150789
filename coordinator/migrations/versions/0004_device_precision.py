"""the precision each worker trains in; the device and precision behind each lineage record

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 18:10:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('precision', sa.String(length=8), server_default='fp32', nullable=False))

    with op.batch_alter_table('lineage', schema=None) as batch_op:
        batch_op.add_column(sa.Column('device', sa.String(length=128), server_default='', nullable=False))
        batch_op.add_column(sa.Column('precision', sa.String(length=8), server_default='', nullable=False))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('lineage', schema=None) as batch_op:
        batch_op.drop_column('precision')
        batch_op.drop_column('device')

    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('precision')

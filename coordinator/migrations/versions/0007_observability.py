"""observability: energy per round and per lineage record, each worker's declared grid intensity, held-out evaluations

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 06:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('grid_gco2_per_kwh', sa.Double(), server_default='0', nullable=False))

    with op.batch_alter_table('contributions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('energy_joules', sa.Double(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('energy_method', sa.String(length=16), server_default='', nullable=False))

    with op.batch_alter_table('lineage', schema=None) as batch_op:
        batch_op.add_column(sa.Column('energy_joules', sa.Double(), server_default='0', nullable=False))

    op.create_table(
        'evaluations',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('round', sa.Integer(), nullable=False),
        sa.Column('params_digest', sa.String(length=64), nullable=False),
        sa.Column('group', sa.String(length=16), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('tokens', sa.BigInteger(), nullable=False),
        sa.Column('bytes', sa.BigInteger(), nullable=False),
        sa.Column('loss', sa.Double(), nullable=False),
        sa.Column('bits_per_byte', sa.Double(), nullable=False),
        sa.Column('worker_id', sa.String(length=64), server_default='', nullable=False),
        sa.Column('created_at', sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('round', 'group', 'name'),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('evaluations')
    with op.batch_alter_table('lineage', schema=None) as batch_op:
        batch_op.drop_column('energy_joules')
    with op.batch_alter_table('contributions', schema=None) as batch_op:
        batch_op.drop_column('energy_method')
        batch_op.drop_column('energy_joules')
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('grid_gco2_per_kwh')

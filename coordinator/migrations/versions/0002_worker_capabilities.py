"""worker capabilities and failure back-off

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 17:11:04.901955

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('memory_bytes', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('bandwidth_mbit', sa.Double(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('trust_class', sa.String(length=16), server_default='volunteer', nullable=False))
        batch_op.add_column(sa.Column('available_until', sa.Double(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('slurm_job_id', sa.String(length=32), server_default='', nullable=False))
        batch_op.add_column(sa.Column('failures', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('backoff_until', sa.Double(), server_default='0', nullable=False))



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('backoff_until')
        batch_op.drop_column('failures')
        batch_op.drop_column('slurm_job_id')
        batch_op.drop_column('available_until')
        batch_op.drop_column('trust_class')
        batch_op.drop_column('bandwidth_mbit')
        batch_op.drop_column('memory_bytes')

